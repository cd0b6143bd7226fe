"""Throwaway servers (embedded Redis and PostgreSQL), the demo, and sample records
in the producers' wire format: for the demo, the tests and the benchmark.
"""
