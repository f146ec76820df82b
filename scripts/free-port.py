#!/usr/bin/env python3
"""Prints a free TCP port on 127.0.0.1 for a server a script starts.

Picked below the kernel's ephemeral range: a port the kernel hands out for port 0 can be
handed out again at once as the source port of an outgoing connection.
"""
import random
import socket

low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    port = random.randrange(max(1024, low - 12000), low)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
