"""Curvature edits (the loss-curvature paper): K-FAC factors, eigenbases, edits, analysis."""
