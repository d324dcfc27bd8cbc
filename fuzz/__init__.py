"""Fuzzing of aprtrace's parsers: seeds made of valid tiny files, mutators, targets, runner."""
