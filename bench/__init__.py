"""Benchmarks against peers, each printing one comparable table (`make bench` runs them all)."""
