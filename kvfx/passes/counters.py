"""Rewrite counters, like torch._inductor's `counters["inductor"]`: every pass bumps one per rewrite."""
from collections import Counter, defaultdict

counters: defaultdict[str, Counter] = defaultdict(Counter)

