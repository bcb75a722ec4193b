"""Steps 5 to 7 of the main job, where the training side meets ``targets``: save and export the student, check
parity, export the ensemble to the same target, score and time every row through one Runner interface, judge the
gain kept, and assemble the report and the bundle.

Public entry points: :func:`export_student`, :func:`export_ensemble`, :func:`build_report`.
"""
