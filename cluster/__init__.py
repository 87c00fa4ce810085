"""Starting or joining the Ray cluster a run uses."""
