"""The floor both packages stand on: project errors, atomic file writes, the preprocessing function, accuracy
metrics, inference helpers and the progress bar. Nothing here imports the training steps or ``targets``, and
``errors``, ``fileio``, ``preprocessing`` and ``metrics`` import no torch, so a serving process needs only numpy.

Import the submodule you need (``compressor.core.errors``); this file re-exports nothing, so importing one light
module never loads torch."""
