"""A TCP proxy on 127.0.0.1:LISTEN to 127.0.0.1:TARGET that delays every
chunk it forwards by DELAY seconds, each way: a database "farther away" for
benchmarks (docs/BENCHMARKS.md, seventh session). Loopback only.

    python3 scripts/lagproxy.py 47001 "$PGPORT" 0.0005 &
    RETRAIN_BENCH_STATE=postgres://postgres@127.0.0.1:47001/db cycle 1000

asyncio's timers make the real delay larger than DELAY: measure the round
trip it gives (`pgbench -n -t 500 -f select1.sql -p 47001`).
"""
import asyncio, sys
LISTEN, TARGET, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await asyncio.sleep(DELAY)
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection('127.0.0.1', TARGET)
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    server = await asyncio.start_server(handle, '127.0.0.1', LISTEN)
    async with server:
        await server.serve_forever()
asyncio.run(main())
