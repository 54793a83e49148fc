"""The distributed runtime: fedtune methods as a Flower ServerApp / ClientApp.

The same method objects, ``FederatedServer`` and ``client_turn`` as the embedded simulator;
only the transport differs (Flower messages with ArrayRecords), so a run on Flower's
simulation or deployment engine aggregates exactly what the simulator aggregates.
"""
