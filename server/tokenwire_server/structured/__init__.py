"""Tool calls and structured output: their schemas, checks and governance.

- `schemas`: a request's JSON Schemas, checked and compiled once; pointers.
- `checks`: the `tool_arguments` and `json_schema` verification checks.
- `json_governance`: a governance session that governs the strings inside
  JSON text and keeps the JSON valid.
- `viability`: strict mode's "can this output still become valid?".
"""
