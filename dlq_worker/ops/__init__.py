"""The operator side: status, doctor, dead letters, and moving the DLQ to another Redis.
"""
