"""Fleet jobs: named rollouts of a device command over a selector (rate, per-device timeout, abort threshold)."""
