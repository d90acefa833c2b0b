"""The tracer provider the server spans come from.

An SDK provider is always used so every call has a real trace id to report in
`Completed.trace_id` and logs, even when nothing is exported. Export is
configured by the standard OTEL_* environment variables when an exporter
package is installed.
"""

from __future__ import annotations

import logging
import os

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from tokenwire_server import __version__

log = logging.getLogger(__name__)


def build_tracer_provider() -> TracerProvider:
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "tokenwire"),
            "service.version": __version__,
        }
    )
    return TracerProvider(resource=resource)
