"""Mail through an SMTP relay (`mail` settings), sent off the request path.

A page that sends a message only puts it on a bounded in-memory queue and answers at once: a relay that is down
or slow never holds up a request. One worker delivers the queue with aiosmtplib, retrying a failed delivery
(`mail.attempts`, backoff from `mail.retry_delay`, doubled each time); a message still undelivered is dropped,
logged (never its links) and counted in `iam_mail_messages_total{result="failed"}`.

Each message is three templates: `<name>.subject.txt`, `<name>.txt` and `<name>.html`, from `mail.templates_dir`
when it has them, else iam/templates/mail/.
"""

from __future__ import annotations

import asyncio
import logging
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from iam.config import Mail
from iam.observability import MAIL_MESSAGES
from iam.tasks import cancel

log = logging.getLogger("iam.mail")

_BUILT_IN = Path(__file__).resolve().parent / "templates" / "mail"


class Mailer:
    """Renders and queues messages; `start()` runs the delivery worker, `stop()` ends it."""

    def __init__(self, settings: Mail | None) -> None:
        self.settings = settings
        loaders = [FileSystemLoader(settings.templates_dir)] if settings and settings.templates_dir else []
        self._templates = Environment(loader=ChoiceLoader([*loaders, FileSystemLoader(_BUILT_IN)]),
                                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined)
        self._queue: asyncio.Queue[tuple[str, EmailMessage]] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return self.settings is not None

    def start(self) -> None:
        if self.settings is not None:
            self._queue = asyncio.Queue(self.settings.queue_size)
            self._worker = asyncio.create_task(self._deliver_all(), name="iam mail")

    async def stop(self) -> None:
        """Deliver what is queued (for at most one attempt's timeout: `iam users add` exits right after), then
        end the worker."""
        if self._worker is not None:
            assert self._queue is not None and self.settings is not None
            try:
                await asyncio.wait_for(self._queue.join(), self.settings.timeout)
            except TimeoutError:
                log.warning("%d mail message(s) still queued at shutdown were dropped", self._queue.qsize())
            await cancel(self._worker)
            self._worker = None

    async def idle(self) -> None:
        """Until every queued message was delivered or dropped (for tests and graceful shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    def send(self, to: str, template: str, **context: object) -> bool:
        """Queue a message to `to` made of `template`; False (logged, metered) when mail is off or the queue full."""
        if self.settings is None or self._queue is None:
            return False
        message = self._message(to, template, context)
        try:
            self._queue.put_nowait((template, message))
        except asyncio.QueueFull:
            MAIL_MESSAGES.labels(template, "dropped").inc()
            log.error("mail queue full: a %s message was dropped", template)
            return False
        return True

    def _message(self, to: str, template: str, context: dict[str, object]) -> EmailMessage:
        assert self.settings is not None
        render = {part: self._templates.get_template(f"{template}.{part}").render(**context)
                  for part in ("subject.txt", "txt", "html")}
        message = EmailMessage()
        message["Subject"] = " ".join(render["subject.txt"].split())  # one line: no header injection
        message["From"] = Address(self.settings.from_name, addr_spec=self.settings.from_address)
        message["To"] = to
        message["Message-ID"] = make_msgid(domain=self.settings.from_address.rsplit("@", 1)[1])
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5: no auto-replies
        message.set_content(render["txt"])
        message.add_alternative(render["html"], subtype="html")
        return message

    async def _deliver_all(self) -> None:
        assert self._queue is not None
        while True:
            template, message = await self._queue.get()
            try:
                await self._deliver(template, message)
            finally:
                self._queue.task_done()

    async def _deliver(self, template: str, message: EmailMessage) -> None:
        settings = self.settings
        assert settings is not None
        delay = settings.retry_delay
        for attempt in range(1, settings.attempts + 1):
            try:
                await aiosmtplib.send(
                    message, hostname=settings.host, port=settings.port, timeout=settings.timeout,
                    use_tls=settings.security == "tls", start_tls=settings.security == "starttls",
                    username=settings.username or None,
                    password=settings.password.get_secret_value() if settings.password else None)
            except (aiosmtplib.SMTPException, OSError) as exc:
                # The relay's answer or the socket error names the cause; the message (with its link) never.
                log.warning("mail delivery attempt %d of %d failed (%s: %s)", attempt, settings.attempts,
                            type(exc).__name__, exc)
                if attempt < settings.attempts:
                    MAIL_MESSAGES.labels(template, "retried").inc()
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            MAIL_MESSAGES.labels(template, "sent").inc()
            return
        MAIL_MESSAGES.labels(template, "failed").inc()
        log.error("a %s message could not be delivered to the relay %s:%d after %d attempts; it was dropped",
                  template, settings.host, settings.port, settings.attempts)
