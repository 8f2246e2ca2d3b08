#!/usr/bin/env python3
"""Makes docs/dashboard.png: an engine with an autoscaling deployment under a load that rises
and falls, a second application failing some requests, a reload, and the dashboard in headless
Chromium after a minute or so, plotted over 1 minute. Usage: dashboard-screenshot.py [OUT.png]
(MOONSERVE_BIN picks the binary, as for the tests)."""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "integration"))

import harness  # noqa: E402
from chromium import Chromium  # noqa: E402
from harness import LoadGen, Server, hello_app  # noqa: E402

TOKEN = "screenshot-token"
AUTOSCALE = {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
             "target_ongoing_requests": 1, "upscale_delay_s": 2, "downscale_delay_s": 8,
             "metrics_interval_s": 0.2, "look_back_period_s": 2}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "docs",
                                                             "dashboard.png")
    srv = Server([hello_app("hello", "/hello", {"autoscaling_config": AUTOSCALE,
                                                "graceful_shutdown_timeout_s": 2}),
                  hello_app("other", "/other", {"num_replicas": 2})],
                 extra_config={"admin": {"token": TOKEN}, "control_loop": {"interval_s": 0.1}})
    browser = None
    loads = []
    try:
        srv.start()
        srv.reload()
        browser = Chromium(width=1400, height=1500)
        browser.navigate("http://127.0.0.1:%d/dashboard/#token=%s&interval=1000"
                         % (srv.admin_port, TOKEN))
        loads.append(LoadGen(srv, "/other/x?sleep=0.02", 1).start())
        # a rising load, a burst of errors, then a calmer phase
        for n, secs in ((2, 12), (4, 15), (1, 12), (3, 12)):
            lg = LoadGen(srv, "/hello/load?sleep=0.25&w={i}", n).start()
            if n == 4:
                loads.append(LoadGen(srv, "/other/boom?sleep=0.01", 1).start())
            time.sleep(secs)
            lg.stop()
            if n == 4:
                loads.pop().stop()
        browser.evaluate("document.querySelector('[data-window=\"60\"]').click()")
        time.sleep(1.5)
        browser.screenshot(out, full_page=True)
        print(out)
    finally:
        for lg in loads:
            lg.stop()
        if browser:
            browser.close()
        srv.stop(check=False)
        srv.cleanup()


if __name__ == "__main__":
    main()
