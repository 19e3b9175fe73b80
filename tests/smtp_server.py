"""A real SMTP server (aiosmtpd) on a free loopback port, in its own thread: the messages iam sends land in
`Inbox.messages`, parsed."""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import socket
from collections.abc import Iterator
from email.message import EmailMessage

from aiosmtpd.controller import Controller


class Inbox:
    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's hook name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def link(self, message: EmailMessage) -> str:
        """The link of a message, as its text part has it (and the HTML part has it too)."""
        text = message.get_body(("plain",)).get_content()
        html = message.get_body(("html",)).get_content()
        link = re.search(r"https?://\S+", text).group(0)
        assert f'href="{link.replace("&", "&amp;")}"' in html
        return link


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running() -> Iterator[Inbox]:
    inbox = Inbox(free_port())
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()
