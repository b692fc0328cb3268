"""`python -m service_registry`: run the service registry."""

from miaas.serve import run_service
from service_registry.app import create_app
from service_registry.settings import ServiceRegistrySettings


def main() -> None:
    settings = ServiceRegistrySettings()  # type: ignore[call-arg]
    run_service("service-registry", create_app(settings), settings.model_copy(update={"service_registry_url": None}))


if __name__ == "__main__":
    main()
