"""What watches the drain: the monitor thread (depth, lag, loss accounting, other
databases), heartbeats, the operators' pause, health, the HTTP endpoints, metrics.
"""
