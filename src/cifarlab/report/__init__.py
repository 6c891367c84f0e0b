"""Figures (matplotlib PNGs) and the self-contained HTML page of an evaluation."""
