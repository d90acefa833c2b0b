"""Validators written by the callers' teams (tokenwire.v1.ValidatorService), called per response.

`config.py` reads `[[validators]]` from the config file, `channels.py` keeps one
channel per validator address, `calls.py` is one validator's call for one
response (`Validate` or `ValidateStream`), `verdicts.py` turns an answer or a
failure into a check, `results.py` is what the verdicts mean together, and
`runner.py` runs a response's validators concurrently with generation.
docs/validation-and-review.md describes the whole feature.
"""
