"""The command layer: everything that parses values from a terminal, prints, draws progress bars
and picks exit codes. Each command calls one library function (a stage) and shows its result;
the stages themselves never print (they return dataclasses, report progress through a callback
and say notes through `logging`, which `console.notes_to_stderr` shows)."""
