@echo off
rem nekotune set-up for cmd.exe, without make: "make.cmd demo" or "make.cmd test"
rem (also test-fast, bench, fuzz, lint, install, clean). The steps are in tools\dev.py,
rem the script make runs on Linux and macOS. For a CUDA torch set TORCH and TORCH_INDEX (README).
setlocal
set "NEKO_PY=python"
where py >nul 2>nul
if %ERRORLEVEL%==0 set "NEKO_PY=py -3"
if defined PY set "NEKO_PY=%PY%"
%NEKO_PY% "%~dp0tools\dev.py" %*
exit /b %ERRORLEVEL%
