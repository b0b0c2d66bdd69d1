"""Helpers that drive a real node from outside, as a user's programs do: `pneumonode serve`
processes, the dcmtk programs, Orthanc, the SIIM sample and small generated images, and
what the node's index says. The tests and the benchmarks (bench/) share them, as
numpy.testing serves numpy's tests; the node itself never imports them.
"""
