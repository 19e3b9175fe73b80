"""iam serve sends a response's head and body in one write (iam/server.py CoalescedWrites)."""

import asyncio

from iam.server import CoalescedWrites


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[object] = []
        self.closing = False

    def write(self, data) -> None:
        self.events.append(bytes(data))

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


async def test_writes_in_one_event_loop_turn_leave_as_one():
    real = Recording()
    transport = CoalescedWrites(real, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.events == [] and transport.get_write_buffer_size() == 40  # held until the turn ends
    await asyncio.sleep(0)
    assert real.events == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert real.events[1:] == [b"next"]


async def test_a_close_sends_what_was_written_first_and_a_closing_transport_gets_nothing_more():
    real = Recording()
    transport = CoalescedWrites(real, asyncio.get_running_loop())
    transport.write(b"last answer")
    transport.close()
    assert real.events == [b"last answer", "close"]
    transport.write(b"after the close")
    await asyncio.sleep(0)
    assert real.events == [b"last answer", "close"]
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the real transport's
