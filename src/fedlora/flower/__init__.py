"""fedlora on Flower (flwr 1.41 Message API): ServerApp, ClientApp and FedLoraStrategy.

    fedlora.flower.server_app:app   ServerApp (component `serverapp` of flower_app/)
    fedlora.flower.client_app:app   ClientApp (component `clientapp`)
    fedlora.flower.strategy         FedLoraStrategy (wraps a fedlora Method)
    fedlora.flower.deploy           local deployment / simulation launchers (flower-demo)

Submodules import flwr; importing this package does not.
"""

__all__ = ["server_app", "client_app", "strategy", "deploy", "common"]
