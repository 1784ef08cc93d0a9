"""Crash tests: power cuts simulated on recorded device writes; every crash image checked."""
