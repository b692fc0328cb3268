"""Code shared by every MIaaS service: wire schemas, settings, errors, Kafka, HTTP and discovery helpers.

This package never imports a service package.
"""

__version__ = "0.1.0"
