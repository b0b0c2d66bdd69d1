"""The classifier's `pneumonode` subcommands (`commands`, free of torch at import) and the
console that long work writes to (`console`: progress bars or log lines, and library
warnings sent to the log). `console` imports nothing of the project, so the data and train
rooms and the node's processes use it too."""
