"""Studies: scripts that write benchmarks/results/ (top of the house: they may import anything; nothing imports them)."""
