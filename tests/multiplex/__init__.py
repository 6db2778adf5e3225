"""Tests of PD multiplexing: performance model, dispatcher, partitioners, profiling."""
