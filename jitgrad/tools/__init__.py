"""Tools: the `jitgrad` command, `jitgrad show`, graphs, memory timelines, memsweep."""
