"""A Windows-like Python for tests: nekotune's own imports of Unix-only modules fail.

`WINDOWS_LIKE_SITECUSTOMIZE` is written as sitecustomize.py into a folder put first on
PYTHONPATH of a child process. From then on, inside modules named nekotune.*:
- `import resource` (fcntl, termios, pwd, grp, ...) raises ImportError, as on Windows;
- `import signal` gives a module with only the names Windows' signal module has
  (no SIGKILL, SIGHUP, SIGUSR1, alarm ...);
- `import os` gives os without the POSIX-only functions (fork, setsid, killpg, getuid ...).
Third-party libraries keep the real modules: only nekotune's own code paths are judged.
"""

UNIX_ONLY_MODULES = ("resource", "fcntl", "termios", "pwd", "grp", "posix", "pty", "tty", "crypt", "syslog",
                     "readline", "curses")
# What Windows' signal module has (CPython 3.10-3.13, Modules/signalmodule.c with MS_WINDOWS).
WINDOWS_SIGNAL_NAMES = ("SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM", "SIGBREAK", "CTRL_C_EVENT",
                        "CTRL_BREAK_EVENT", "NSIG", "SIG_DFL", "SIG_IGN", "Signals", "Handlers", "signal", "getsignal",
                        "default_int_handler", "raise_signal", "set_wakeup_fd", "strsignal", "valid_signals")
# os functions and constants that Windows' os module lacks.
POSIX_ONLY_OS = ("fork", "forkpty", "setsid", "setpgid", "getpgid", "killpg", "getuid", "geteuid", "getgid",
                 "getegid", "setuid", "setgid", "seteuid", "setegid", "getgroups", "setgroups", "initgroups", "chown",
                 "lchown", "fchown", "getpgrp", "setpgrp", "wait3", "wait4", "WNOHANG", "nice", "getloadavg",
                 "uname", "sync", "sched_getaffinity", "sched_setaffinity", "sysconf", "statvfs", "fstatvfs",
                 "mkfifo", "mknod", "openpty", "pipe2", "posix_spawn", "posix_spawnp", "pread", "pwrite",
                 "getpriority", "setpriority", "ttyname", "ctermid", "fchdir", "chroot", "O_NOFOLLOW", "O_DIRECTORY",
                 "O_CLOEXEC", "getresuid", "getresgid", "setresuid", "setresgid", "getsid", "tcgetpgrp",
                 "tcsetpgrp", "WUNTRACED", "WCONTINUED")

WINDOWS_LIKE_SITECUSTOMIZE = f'''
import builtins
import os as _os
import signal as _signal
import types

BLOCKED = {UNIX_ONLY_MODULES!r}
WINDOWS_SIGNAL = {WINDOWS_SIGNAL_NAMES!r}
POSIX_ONLY = {POSIX_ONLY_OS!r}

_signal_proxy = types.ModuleType("signal")
for _name in WINDOWS_SIGNAL:
    if hasattr(_signal, _name):
        setattr(_signal_proxy, _name, getattr(_signal, _name))
_signal_proxy.SIGBREAK = getattr(_signal, "SIGBREAK", 21)
_os_proxy = types.ModuleType("os")
_os_proxy.__dict__.update({{k: v for k, v in _os.__dict__.items() if k not in POSIX_ONLY}})
_real_import = builtins.__import__


def _ours(globals_):
    name = (globals_ or {{}}).get("__name__") or ""
    return name == "nekotune" or name.startswith("nekotune.")


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and _ours(globals):
        top = name.split(".")[0]
        if top in BLOCKED:
            raise ImportError(f"No module named {{top!r}} (nekotune test: Windows has no {{top}})", name=top)
        if name == "signal":
            return _signal_proxy
        if top == "os" and (name == "os" or not fromlist):
            return _os_proxy
    return _real_import(name, globals, locals, fromlist, level)


builtins.__import__ = _import
'''
