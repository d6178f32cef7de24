"""What the benchmark suites share: the report writer with its provenance (report.py),
process memory measurement (memory.py) and the matplotlib check (plotting.py)."""
