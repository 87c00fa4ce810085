"""Bundled source clips, editing prompts, and the checkable colour edits used to synthesise targets."""
