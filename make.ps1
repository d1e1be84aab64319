# nekotune set-up for Windows PowerShell, without make:
#   .\make.ps1 demo      create .venv, install everything, fine-tune the demo
#   .\make.ps1 test      the same set-up, then the test suite
# (also test-fast, bench, fuzz, lint, install, clean). The steps are in tools\dev.py, the
# script `make` runs on Linux and macOS. Set $env:TORCH / $env:TORCH_INDEX for a CUDA torch
# (README, "Windows"). If scripts are blocked: powershell -ExecutionPolicy Bypass -File .\make.ps1 demo
$ErrorActionPreference = "Stop"
$script = Join-Path $PSScriptRoot "tools\dev.py"
if ($env:PY) { $py = @($env:PY) }
elseif (Get-Command py -ErrorAction SilentlyContinue) { $py = @("py", "-3") }
else { $py = @("python") }
$exe = $py[0]
$pre = @($py | Select-Object -Skip 1)
& $exe @pre $script @args
exit $LASTEXITCODE
