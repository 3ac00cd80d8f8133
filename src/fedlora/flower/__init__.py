"""fedlora on Flower: a ServerApp and a ClientApp on Flower's Message API (extra ``fedlora[flower]``).

The Flower layer only moves arrays and calls fedlora's own functions: the server plans, aggregates
and evaluates exactly as the in-process engine (it *is* a :class:`~fedlora.federation.simulation.Simulation`
whose client loop sends messages), and each ClientApp calls :func:`~fedlora.federation.client.run_client`
with its partition's ClientSpec and the ClientState it keeps in its node-local ``Context.state``.
"""
