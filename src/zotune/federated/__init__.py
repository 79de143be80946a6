"""Federated fine-tuning over Flower: clients exchange (seed, g) records, not weights.

server.py       the ServerApp (rounds over Flower's Grid, evaluation, run folder)
client.py       the ClientApp (catch up from records, local P-RGE steps, reply)
coordinator.py  global state, what each client is sent, validation and aggregation
protocol.py     message encoding, byte counts, reply checks
partition.py    IID and Dirichlet label-skew partitions of the train split
workspace.py    one loaded model per process
simulate.py     `zotune federate`: the same apps in Flower's simulation engine
"""
