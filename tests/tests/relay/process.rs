//! Real relay processes: restarts, kill -9, SIGTERM, logs, health, metrics.
