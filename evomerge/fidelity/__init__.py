"""Cheap fitness: estimate a candidate's full task score from its answers on a small fixed item subset."""
