"""The task catalogue: classic circuit tasks (IOI, greater-than, induction, ...) as circuits.Task."""
