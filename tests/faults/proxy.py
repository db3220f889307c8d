"""A loopback TCP proxy that can cut its clients off (a network partition for one process).

``cut()`` closes every forwarded connection and from then on accepts new connections but never
answers them (a black hole: clients see timeouts, not refusals); ``heal()`` closes the held
connections and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class BlockingProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.listen_port, self.target_port = host, listen_port, target_port
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> BlockingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.listen_port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._cut:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self._cut:  # black hole: hold the connection, say nothing
                while self._cut and not reader.at_eof():
                    await asyncio.sleep(0.1)
                return
            up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
            self._writers.add(up_w)
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _close_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.close()
        self._writers.clear()

    def cut(self) -> None:
        def go() -> None:
            self._cut = True
            self._close_all()

        self._loop.call_soon_threadsafe(go)

    def heal(self) -> None:
        def go() -> None:
            self._cut = False
            self._close_all()

        self._loop.call_soon_threadsafe(go)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            self._close_all()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
