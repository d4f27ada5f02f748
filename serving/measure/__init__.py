"""Measurement tools of the server, beside (not among) its production modules: a real `bentoml serve` on a free
port (launch), load generators that do not eat the CPU they measure (loadgen), and the server-vs-in-process
benchmark (bench: ``python -m serving.measure.bench``)."""
