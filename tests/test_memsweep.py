"""`jitgrad memsweep` end to end on a tiny chain: every policy runs in its own process."""

import csv

from jitgrad.tools import cli, memsweep


def test_memsweep_table_csv_and_plot(tmp_path, capsys):
    csv_path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    timeline = tmp_path / "timeline.png"
    code = cli.main(["memsweep", "--depth", "6", "--width", "32", "--batch", "256",
                     "--rounds", "1", "--steps", "2", "--budgets", "1k,200KiB", "--quiet",
                     "--csv", str(csv_path), "--plot", str(png), "--timeline", str(timeline)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["policy"] for r in rows] == ["none", "sqrt", "budget", "budget"]
    none, sqrt, tiny, fits = rows
    # 1 kB cannot hold a step: the row says so and names the smallest arena that would
    assert "cannot be met" in tiny["error"] and "smallest arena" in tiny["error"]
    assert int(sqrt["planned_peak"]) < int(none["planned_peak"])
    assert int(fits["planned_peak"]) <= 200 * 1024
    for r in (none, sqrt, fits):
        assert int(r["lower_bound"]) <= int(r["planned_peak"])
        assert float(r["step_ms"]) > 0 and int(r["measured_peak"]) >= 0
    assert float(none["recompute_ratio"]) == 0 < float(sqrt["recompute_ratio"])
    assert png.stat().st_size > 1000 and timeline.stat().st_size > 1000
    assert "policy" in out and "sqrt" in out and "cannot be met" in out


def test_memsweep_policy_options():
    assert memsweep.jit_options("none") == {}
    assert memsweep.jit_options("sqrt") == {"remat": "sqrt"}
    assert memsweep.jit_options("full") == {"remat": "full"}
    assert memsweep.jit_options("4096") == {"memory_budget": 4096}
    assert cli.main(["memsweep", "--policies", "everything", "--budgets", "1k"]) == 2


def test_gpt_block_checkpoints_store_less_and_recompute():
    """The GPT's policies, planned only (nothing compiled): checkpointing every block keeps
    fewer values than storing everything and recomputes part of the forward pass."""
    model = memsweep.GPTModel(n_layer=3, n_embd=16, n_head=2, block=16, batch=8)
    none, blocks = memsweep.planned(model, "none"), memsweep.planned(model, "blocks")
    assert blocks.peak_live_bytes < none.peak_live_bytes
    assert "GPT" in model.title
    assert cli.main(["memsweep", "--policies", "blocks", "--budgets", "1k"]) == 2  # MLP only
