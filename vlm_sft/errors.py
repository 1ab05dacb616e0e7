"""The errors that cross layers: each means "this input cannot work" and carries one line naming the field, file
or row. main.py turns them into that line and an exit; they live here, importing nothing of vlm_sft, so that any
layer may raise them without importing the layer that reports them (or one above itself)."""


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


class ModelLoadError(ValueError):
    """actor.model.model_path is not a usable model directory of a supported family; the message says why."""


class DamagedFileError(ValueError):
    """A file is missing, truncated, corrupted or unreadable; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model it is loaded into; the message says which."""


class ExportError(ValueError):
    """The export cannot be written as asked; the message names the flag or file."""


class RowError(ValueError):
    """A row that cannot be used; the message names the file, the row and what is wrong.

    `reason` is a short category ("image", "answer", "choices", "question", "json", ...) for counting bad rows
    (the preflight check reports them by reason)."""

    def __init__(self, message: str, reason: str = "row"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep `reason` when a DataLoader worker sends the error back pickled
        return type(self), (str(self), self.reason)


class PromptTooLong(ValueError):
    """A prompt (image tokens included) longer than data.max_prompt_length that cannot or may not be cut."""


class DataCheckFailed(ValueError):
    """The run as configured would stop on the data; the message says why in one line."""
