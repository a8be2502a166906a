"""Local demo for `./dev.sh demo`."""
