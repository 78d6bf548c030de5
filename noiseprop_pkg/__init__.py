"""noiseprop: predict what weight noise does to a trained network, and prove it.

Sub-packages:
- :mod:`noiseprop.theory`: noise models, analytic prediction, flatness, symbolic derivations.
- :mod:`noiseprop.empirical`: data, models, training, Monte-Carlo injection, statistics, studies.
"""
__version__ = "0.1.0"
