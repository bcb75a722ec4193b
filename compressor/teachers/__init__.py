"""Step 1 and 2 of the main job: the teacher ensemble — loading and saving its files, validating and running its
members, combining them into soft targets — and its diagnostics; a specialist ensemble's combination (paper §5).

Public entry points: :func:`load_ensemble`, :func:`save_ensemble`, :class:`Ensemble`, :func:`diagnose`.
"""

from compressor.teachers.diagnostics import diagnose
from compressor.teachers.ensemble import Ensemble, Member
from compressor.teachers.formats import load_ensemble, save_ensemble

__all__ = ["Ensemble", "Member", "diagnose", "load_ensemble", "save_ensemble"]
