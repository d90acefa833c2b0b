"""Validators written by the callers' teams (tokenwire.v1.ValidatorService), called per response.

`config.py` reads `[[validators]]` from the config file, `channels.py` keeps one
channel per validator address, `runner.py` runs a response's validators
concurrently with generation and turns their verdicts into checks and a final
payload. docs/validation-and-review.md describes the whole feature.
"""
