<#
.SYNOPSIS
Installs GPUStack from this offline bundle on an air-gapped Windows host.

.DESCRIPTION
The same flow as install.sh on Linux. The bundle is verified and the host is checked before
anything on the system changes. The install goes into a new release directory
<Prefix>\releases\<release>, and the <Prefix>\current junction moves only after the new release
works, so a failed run leaves the site as it was and a good run can be rolled back by pointing
the junction at the previous release again.

When bundle.env names a tools archive (TOOLS_ARCHIVE, the tar.gz of 'gpustack download-tools
--save-archive'), it is loaded into the new release before the junction moves, after
check-tools-archive.py has found every entry safe to unpack: upstream's --load-archive unpacks
with no filter.

Exit codes: 0 installed (or already installed), 2 usage error, 3 damaged bundle or a tools
archive refused by check-tools-archive.py, 4 preflight failed, 5 install step failed (pip,
'gpustack version' or loading the tools; nothing switched), 6 could not switch current.

.PARAMETER Prefix
Install prefix (default C:\gpustack).

.PARAMETER Python
Python interpreter for the virtual environment (default: py -<TARGET_PYTHON>, else python).

.PARAMETER SkipPreflight
Do not check the host (architecture, Python, NVIDIA driver, disk space) before installing.

.EXAMPLE
powershell -ExecutionPolicy Bypass -File .\install.ps1 -Prefix C:\gpustack
#>
[CmdletBinding(PositionalBinding = $false)]
param(
    [string]$Prefix = 'C:\gpustack',
    [string]$Python = '',
    [switch]$SkipPreflight,
    [switch]$Help,
    # Catches anything else so that a wrong argument is a usage error (exit 2), not a crash.
    [Parameter(ValueFromRemainingArguments = $true)]
    [string[]]$Rest
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$Prog = 'install.ps1'

function Fail([int]$Code, [string]$Message) {
    [Console]::Error.WriteLine("${Prog}: error: $Message")
    exit $Code
}

function Say([string]$Message) { Write-Host "${Prog}: $Message" }

# Runs a program and returns its exit code (and its stdout when -Capture). Windows PowerShell
# turns a native program's stderr into error records, which 'Stop' would make fatal; a missing
# program becomes exit code -1.
function Invoke-Native {
    param([string]$Exe, [string[]]$Arguments = @(), [switch]$Capture)
    $old = $ErrorActionPreference
    $ErrorActionPreference = 'Continue'
    $out = @()
    $code = -1
    if ($null -eq (Get-Command $Exe -ErrorAction SilentlyContinue)) {
        return [pscustomobject]@{ Code = -1; Output = '' }
    }
    try {
        if ($Capture) { $out = @(& $Exe @Arguments 2>$null) } else { & $Exe @Arguments | Out-Host }
        $code = $LASTEXITCODE
    } catch {
        $code = -1
    } finally {
        $ErrorActionPreference = $old
    }
    return [pscustomobject]@{ Code = $code; Output = ($out -join "`n") }
}

# True when dotted version $Have >= $Need, compared numerically per component (12.10 > 12.8).
function Test-VersionAtLeast([string]$Have, [string]$Need) {
    try { return ([version]$Have) -ge ([version]$Need) } catch { return $false }
}

if ($Help) {
    Write-Host @"
Usage: install.ps1 [-Prefix DIR] [-Python PATH] [-SkipPreflight] [-Help]

Installs GPUStack from this bundle into DIR\releases\<release>, loads the bundle's tools
archive (llama-box, gguf-parser, fastfetch) into it if it has one, then points the DIR\current
junction at it.

  -Prefix DIR      install prefix (default: C:\gpustack)
  -Python PATH     Python interpreter (default: py -<TARGET_PYTHON>, else python)
  -SkipPreflight   do not check the host before installing
  -Help            show this help

Exit codes: 0 installed, 2 usage error, 3 damaged bundle or unsafe tools archive,
4 preflight failed, 5 install failed (nothing switched), 6 could not switch the current junction.
"@
    exit 0
}
if ($Rest) { Fail 2 "unknown argument: $($Rest -join ' '); see -Help" }
if (-not $Prefix) { Fail 2 '-Prefix must not be empty; see -Help' }

# A relative prefix is relative to where the operator ran us, not to the bundle.
$Prefix = [System.IO.Path]::GetFullPath([System.IO.Path]::Combine((Get-Location).ProviderPath, $Prefix)).TrimEnd('\')
$Bundle = (Get-Item -LiteralPath $PSScriptRoot).FullName.TrimEnd('\')
Set-Location -LiteralPath $Bundle

# ---------------------------------------------------------------------------------------------
# Integrity: every file listed in SHA256SUMS must match it, and nothing else may be there.
# Done before bundle.env is read, so a damaged bundle is reported as damaged.

function Test-Bundle {
    $sums = Join-Path $Bundle 'SHA256SUMS'
    if (-not (Test-Path -LiteralPath $sums -PathType Leaf)) {
        Fail 3 "SHA256SUMS not found in ${Bundle}: the bundle is incomplete; re-copy the whole bundle from the source media"
    }
    Say 'verifying the bundle against SHA256SUMS'
    $problems = New-Object System.Collections.Generic.List[string]
    $listed = @{}   # relative path (forward slashes) -> lower-case hex digest
    foreach ($line in [System.IO.File]::ReadAllLines($sums)) {
        if ($line -match '^([0-9a-fA-F]{64}) [ *](?:\./)?(.+)$') {
            $listed[$Matches[2]] = $Matches[1].ToLowerInvariant()
        } elseif ($line.Trim() -ne '') {
            $problems.Add("SHA256SUMS has a malformed line: $line")
        }
    }
    foreach ($rel in @($listed.Keys | Sort-Object)) {
        $path = Join-Path $Bundle ($rel -replace '/', '\')
        if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
            $problems.Add("missing: $rel")
        } elseif ((Get-FileHash -LiteralPath $path -Algorithm SHA256).Hash.ToLowerInvariant() -ne $listed[$rel]) {
            $problems.Add("altered (checksum mismatch): $rel")
        }
    }
    foreach ($file in @(Get-ChildItem -LiteralPath $Bundle -Recurse -File -Force | Sort-Object FullName)) {
        $rel = $file.FullName.Substring($Bundle.Length + 1) -replace '\\', '/'
        if ($rel -ne 'SHA256SUMS' -and -not $listed.ContainsKey($rel)) {
            $problems.Add("unexpected file (not in SHA256SUMS): $rel")
        }
    }
    if ($problems.Count -gt 0) {
        foreach ($p in $problems) { [Console]::Error.WriteLine("${Prog}: $p") }
        Fail 3 "the bundle in $Bundle is damaged ($($problems.Count) problem(s) listed above); re-copy the whole bundle from the source media and run $Prog again"
    }
    Say 'bundle verified'
}

function Read-BundleEnv {
    $path = Join-Path $Bundle 'bundle.env'
    if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
        Fail 3 "bundle.env not found in $Bundle; re-copy the whole bundle from the source media"
    }
    $values = @{}
    foreach ($line in [System.IO.File]::ReadAllLines($path)) {
        if ($line -match '^([A-Z_][A-Z0-9_]*)=(.*)$') { $values[$Matches[1]] = $Matches[2] }
    }
    foreach ($key in 'BUNDLE_CELL', 'GPUSTACK_VERSION', 'TARGET_ARCH', 'TARGET_DEVICE', 'TARGET_PYTHON') {
        if (-not $values.ContainsKey($key) -or -not $values[$key]) {
            Fail 3 "bundle.env has no $key; re-copy the whole bundle from the source media"
        }
    }
    if (-not $values.ContainsKey('TOOLS_ARCHIVE')) { $values['TOOLS_ARCHIVE'] = '' }   # optional
    Test-ToolsFiles $values['TOOLS_ARCHIVE']
    return $values
}

# The tools archive and its checker must be in the bundle before anything changes; what is
# inside the archive is checked once the release's Python exists (Import-Tools).
function Test-ToolsFiles([string]$Archive) {
    if (-not $Archive) { return }
    $slashed = '/' + ($Archive -replace '\\', '/') + '/'
    if ($slashed -like '//*' -or $slashed -like '*/../*' -or $Archive -match '^[A-Za-z]:') {
        Fail 3 "bundle.env has TOOLS_ARCHIVE=$Archive, not a path inside the bundle; re-copy the whole bundle from the source media"
    }
    if (-not (Test-Path -LiteralPath (Join-Path $Bundle ($Archive -replace '/', '\')) -PathType Leaf)) {
        Fail 3 "the tools archive $Archive named in bundle.env is not in $Bundle; re-copy the whole bundle from the source media"
    }
    if (-not (Test-Path -LiteralPath (Join-Path $Bundle 'check-tools-archive.py') -PathType Leaf)) {
        Fail 3 "check-tools-archive.py not found in $Bundle; re-copy the whole bundle from the source media"
    }
}

# The interpreter as an executable plus leading arguments: the py launcher picks a version by flag.
function Resolve-Python([string]$Want) {
    if ($Python) { return @{ Exe = $Python; Args = @() } }
    $probe = 'import sys; print(sys.version_info[0])'
    if ((Invoke-Native 'py' @("-$Want", '-c', $probe) -Capture).Code -eq 0) {
        return @{ Exe = 'py'; Args = @("-$Want") }
    }
    return @{ Exe = 'python'; Args = @() }
}

# ---------------------------------------------------------------------------------------------
# Preflight: the checks of preflight.sh that apply on Windows.

$Checks = New-Object System.Collections.Generic.List[object]
function Add-Check([string]$Name, [string]$Status, [string]$Detail, [string]$Fix = '') {
    $Checks.Add([pscustomobject]@{ Name = $Name; Status = $Status; Detail = $Detail; Fix = $Fix })
}

function Test-Host {
    # 32-bit PowerShell on 64-bit Windows reports x86 here and the real value in the W6432 twin.
    $arch = if ($env:PROCESSOR_ARCHITEW6432) { $env:PROCESSOR_ARCHITEW6432 } else { $env:PROCESSOR_ARCHITECTURE }
    $hostArch = $arch
    if ($arch -eq 'AMD64') { $hostArch = 'amd64' } elseif ($arch -eq 'ARM64') { $hostArch = 'arm64' }
    if ($hostArch -eq $Cell.TARGET_ARCH) {
        Add-Check 'arch' 'ok' $hostArch
    } else {
        Add-Check 'arch' 'fail' "host is $hostArch; this bundle is for $($Cell.TARGET_ARCH)" "use the $hostArch bundle of the same cell"
    }

    $want = $Cell.TARGET_PYTHON
    $hint = "install Python $want for Windows (python.org installer, with the py launcher) and pass -Python C:\path\to\python.exe"
    $r = Invoke-Native $Py.Exe ($Py.Args + @('-c', 'import sys; print("%d.%d.%d" % sys.version_info[:3])')) -Capture
    if ($r.Code -ne 0) {
        Add-Check 'python' 'fail' "Python interpreter '$($Py.Exe) $($Py.Args -join ' ')' not found or does not run" $hint
    } else {
        $version = $r.Output.Trim()
        $xy = ($version -split '\.')[0..1] -join '.'
        if ($xy -ne $want) {
            Add-Check 'python' 'fail' "found Python $version; this bundle's wheels are for Python $want" "$hint, or use the py$xy bundle of the same cell"
        } elseif (-not (Test-VersionAtLeast $xy '3.10') -or (Test-VersionAtLeast $xy '3.13')) {
            Add-Check 'python' 'fail' "this bundle is for Python $xy; GPUStack supports 3.10 to 3.12" 'use a bundle built for Python 3.10 to 3.12'
        } else {
            Add-Check 'python' 'ok' "$version ($($Py.Exe) $($Py.Args -join ' '))"
        }
        if ((Invoke-Native $Py.Exe ($Py.Args + @('-c', 'import venv, ensurepip')) -Capture).Code -eq 0) {
            Add-Check 'python-venv' 'ok' 'venv and ensurepip available'
        } else {
            Add-Check 'python-venv' 'fail' 'this Python cannot create virtual environments' 'reinstall Python from the python.org installer (it includes venv and pip)'
        }
    }

    $floor = $Cell.CUDA_FLOOR
    if ($Cell.TARGET_DEVICE -like 'cuda*' -and $floor) {
        $smi = Invoke-Native 'nvidia-smi' @() -Capture
        if ($smi.Code -ne 0) {
            Add-Check 'nvidia-smi' 'fail' "nvidia-smi not found or failed; this is a $($Cell.TARGET_DEVICE) bundle" "install the NVIDIA driver with CUDA >= $floor support, or use the cpu bundle"
        } elseif ($smi.Output -match 'CUDA Version: *([0-9][0-9.]*)') {
            $driverCuda = $Matches[1]
            if (Test-VersionAtLeast $driverCuda $floor) {
                Add-Check 'cuda-driver' 'ok' "driver supports CUDA $driverCuda (need >= $floor)"
            } else {
                $fix = "upgrade the NVIDIA driver to one that supports CUDA $floor or newer"
                if (Test-VersionAtLeast $floor '12.5') { $fix += ', or use the cuda12.4 bundle of the same cell' }
                Add-Check 'cuda-driver' 'fail' "driver supports CUDA $driverCuda; this bundle needs >= $floor" $fix
            }
        } else {
            Add-Check 'cuda-driver' 'fail' "cannot read 'CUDA Version' from nvidia-smi" 'make sure the NVIDIA driver is loaded (run nvidia-smi), then run the installer again'
        }
    }

    # Twice the wheelhouse: the venv holds the unpacked wheels, pip needs room to unpack.
    $wheelBytes = (Get-ChildItem -LiteralPath (Join-Path $Bundle 'wheels') -Recurse -File -Force | Measure-Object -Property Length -Sum).Sum
    $need = 2 * [int64]$wheelBytes
    $MiB = 1048576
    try {
        $free = (New-Object System.IO.DriveInfo ([System.IO.Path]::GetPathRoot($Prefix))).AvailableFreeSpace
        if ($free -ge $need) {
            Add-Check 'disk' 'ok' ("{0} MiB free for {1} (need {2} MiB)" -f [int64]($free / $MiB), $Prefix, [int64]($need / $MiB))
        } else {
            Add-Check 'disk' 'fail' ("{0} MiB free; installing into {1} needs {2} MiB" -f [int64]($free / $MiB), $Prefix, [int64]($need / $MiB)) 'free space there or pass -Prefix on a drive with enough room'
        }
    } catch {
        Add-Check 'disk' 'warn' "cannot read free space for $Prefix" ("make sure {0} MiB are free there" -f [int64]($need / $MiB))
    }

    $failed = 0
    foreach ($c in $Checks) {
        $tag = if ($c.Status -eq 'ok') { ' ok ' } else { $c.Status }
        Write-Host ('[{0}] {1,-12} {2}' -f $tag, $c.Name, $c.Detail)
        if ($c.Fix) { Write-Host ('       {0,-12} fix: {1}' -f '', $c.Fix) }
        if ($c.Status -eq 'fail') { $failed++ }
    }
    if ($failed -gt 0) { Fail 4 'preflight failed; fix the items above or pass -SkipPreflight' }
    Write-Host "preflight: passed; this host can install $($Cell.BUNDLE_CELL)"
}

# ---------------------------------------------------------------------------------------------
# Tools: the bundle's tools archive, loaded into the new release before it is marked complete,
# so a failure here removes the release and leaves the junction where it was. (On Windows
# tarfile sets no owners, so there is nothing to hand back as install.sh does as root.)

# Exit code for the failure Install-Release reports: 3 when the archive is refused, else 5.
$FailCode = 5

function Import-Tools {
    $relative = $Cell.TOOLS_ARCHIVE
    if (-not $relative) {
        Say 'this bundle has no tools archive (TOOLS_ARCHIVE in bundle.env); not loading tools'
        return
    }
    $archive = Join-Path $Bundle ($relative -replace '/', '\')
    $venvPython = Join-Path $Rel 'Scripts\python.exe'

    Say "checking the tools archive $relative"
    # -I: the bundle folder and PYTHON* variables must not change which modules the check imports.
    $check = Invoke-Native $venvPython @('-I', (Join-Path $Bundle 'check-tools-archive.py'), $archive)
    if ($check.Code -eq 3) {
        $script:FailCode = 3
        throw "the tools archive $archive is not safe to unpack (entries listed above); nothing was switched; re-copy the bundle from the source media, or rebuild the bundle if the copy there is the same"
    }
    if ($check.Code -ne 0) {
        throw "check-tools-archive.py could not check $archive (exit $($check.Code), see above); nothing was switched"
    }

    Say "loading the tools from $relative"
    # GPUSTACK_* variables of the host would change what download-tools does (a download base URL
    # even makes it refuse --load-archive), so they are cleared for this one command.
    $names = 'GPUSTACK_TOOLS_DOWNLOAD_BASE_URL', 'GPUSTACK_SAVE_ARCHIVE', 'GPUSTACK_LOAD_ARCHIVE',
        'GPUSTACK_SYSTEM', 'GPUSTACK_ARCH', 'GPUSTACK_DEVICE'
    $saved = @{}
    foreach ($name in $names) {
        $saved[$name] = [Environment]::GetEnvironmentVariable($name, 'Process')
        [Environment]::SetEnvironmentVariable($name, $null, 'Process')
    }
    try {
        $load = Invoke-Native (Join-Path $Rel 'Scripts\gpustack.exe') @('download-tools', '--load-archive', $archive)
    } finally {
        foreach ($name in $names) { [Environment]::SetEnvironmentVariable($name, $saved[$name], 'Process') }
    }
    if ($load.Code -ne 0) {
        throw "'$Rel\Scripts\gpustack.exe download-tools --load-archive $archive' failed (see above); nothing was switched"
    }

    # The installed package's tools folder; find_spec locates it without running its __init__.
    # Single quotes only: Windows PowerShell mangles double quotes inside native arguments.
    $probe = 'import importlib.util, os; print(os.path.join(list(importlib.util.find_spec(''gpustack'').submodule_search_locations)[0], ''third_party'', ''bin''))'
    $where = Invoke-Native $venvPython @('-I', '-c', $probe) -Capture
    if ($where.Code -ne 0) {
        throw "cannot find the gpustack package in $Rel; nothing was switched"
    }
    $dir = $where.Output.Trim()
    $versionsFile = Join-Path $dir 'versions.json'
    if (-not (Test-Path -LiteralPath $versionsFile -PathType Leaf)) {
        throw "the tools archive $relative has no versions.json; $dir is not a GPUStack tools folder; nothing was switched"
    }
    try {
        $versions = [System.IO.File]::ReadAllText($versionsFile) | ConvertFrom-Json
        if ($versions -isnot [System.Management.Automation.PSCustomObject]) { throw 'not a JSON object' }
        $entries = @($versions.PSObject.Properties | Sort-Object Name)
    } catch {
        throw "$versionsFile is not readable ($($_.Exception.Message)); nothing was switched"
    }
    Say "tools loaded into $dir (from versions.json):"
    foreach ($e in $entries) { Write-Host ('  {0,-40} {1}' -f $e.Name, $e.Value) }
}

# ---------------------------------------------------------------------------------------------
# Install into a new release directory; remove it again unless it reached .complete.

function Install-Release {
    if (Test-Path -LiteralPath (Join-Path $Rel '.complete')) {
        Say "release $RelName is already installed; not reinstalling"
        return
    }
    try {
        New-Item -ItemType Directory -Force -Path (Join-Path $Prefix 'releases') | Out-Null
    } catch {
        Fail 5 "cannot create $Prefix\releases; run as Administrator or pass -Prefix to a directory you can write"
    }
    if (Test-Path -LiteralPath $Rel) {
        Say "removing the incomplete release $RelName left by an earlier run"
        Remove-Item -LiteralPath $Rel -Recurse -Force
    }

    $problem = $null
    try {
        Say "creating the virtual environment $Rel"
        if ((Invoke-Native $Py.Exe ($Py.Args + @('-m', 'venv', $Rel))).Code -ne 0) {
            throw "could not create a virtual environment with $($Py.Exe) $($Py.Args -join ' '); reinstall Python from the python.org installer or pass -Python"
        }
        Say "installing $($Cell.REQUIREMENT) from the bundled wheels"
        # The site's pip configuration must not change what gets installed: no config files
        # (PIP_CONFIG_FILE=nul) and no PIP_* variables (--isolated).
        $venvPython = Join-Path $Rel 'Scripts\python.exe'
        $env:PIP_CONFIG_FILE = 'nul'
        try {
            $pip = Invoke-Native $venvPython @('-m', 'pip', '--isolated', 'install', '--no-index',
                '--find-links', (Join-Path $Bundle 'wheels'), '--require-hashes', '--only-binary=:all:',
                '--no-deps', '-r', (Join-Path $Bundle 'requirements.txt'))
        } finally {
            Remove-Item Env:\PIP_CONFIG_FILE -ErrorAction SilentlyContinue
        }
        if ($pip.Code -ne 0) {
            throw "pip could not install the bundled wheels into $Rel (see pip's messages above); nothing was switched"
        }
        if ((Invoke-Native (Join-Path $Rel 'Scripts\gpustack.exe') @('version')).Code -ne 0) {
            throw "the installed '$Rel\Scripts\gpustack.exe version' failed (see above); nothing was switched"
        }
        Import-Tools
        New-Item -ItemType File -Path (Join-Path $Rel '.complete') | Out-Null
    } catch {
        $problem = $_.Exception.Message
    } finally {
        # Also runs on Ctrl+C: never leave a release without .complete behind.
        if (-not (Test-Path -LiteralPath (Join-Path $Rel '.complete')) -and (Test-Path -LiteralPath $Rel)) {
            Remove-Item -LiteralPath $Rel -Recurse -Force -ErrorAction SilentlyContinue
            [Console]::Error.WriteLine("${Prog}: removed the partial release $Rel")
        }
    }
    if ($problem) { Fail $script:FailCode $problem }
}

# ---------------------------------------------------------------------------------------------
# Switch: replace the current junction. Windows has no atomic rename over a junction, so the old
# one is removed and the new one created; if creating fails the old one is put back.

function Get-CurrentJunction {
    $item = Get-Item -LiteralPath $Current -Force -ErrorAction SilentlyContinue
    if ($null -eq $item) { return $null }
    if (-not ($item.Attributes -band [System.IO.FileAttributes]::ReparsePoint)) {
        Fail 6 "$Current exists and is not a junction; move it out of the way and run $Prog again"
    }
    return $item
}

# The air-gapped configuration, as install.sh writes it: written once, a site's edits are kept.
function Write-SiteConfig([string]$Catalog) {
    $script:Config = Join-Path $Prefix 'gpustack.yaml'
    $script:EnvFile = Join-Path $Prefix 'gpustack.env'
    if (Test-Path -LiteralPath $Config) { Say "kept the existing $Config" } else {
        $text = @"
# GPUStack configuration for an air-gapped site, written by install.ps1 ($($Cell.BUNDLE_CELL)).
# Each setting keeps the first start from reaching for the internet; delete one to turn
# upstream's behaviour back on.

# --model-catalog-file: the catalog shipped in the installed wheel, instead of probing
# huggingface.co and modelscope.cn to choose one.
model_catalog_file: '$Catalog'

# --update-check-url: a closed local port. The check fails at once, and its cached failure also
# answers the UI's /update/ request, which ignores --disable-update-check.
update_check_url: http://127.0.0.1:1/

# --tools-download-base-url: a tool found missing fails at once instead of probing github.com
# and GPUStack's COS mirror. This bundle's tools archive was loaded into the release.
tools_download_base_url: http://127.0.0.1:1
"@
        try { Set-Content -LiteralPath $Config -Value $text -Encoding UTF8 } catch { Fail 6 "could not write ${Config}: $_" }
        Say "wrote $Config"
    }
    if (Test-Path -LiteralPath $EnvFile) { Say "kept the existing $EnvFile" } else {
        $text = @"
# Environment for GPUStack on an air-gapped site, written by install.ps1: switches of libraries
# GPUStack runs that no GPUStack option covers. Delete a line to undo it.
HF_HUB_OFFLINE=1
HF_HUB_DISABLE_TELEMETRY=1
DO_NOT_TRACK=1
VLLM_NO_USAGE_STATS=1
RAY_USAGE_STATS_ENABLED=0
"@
        try { Set-Content -LiteralPath $EnvFile -Value $text -Encoding UTF8 } catch { Fail 6 "could not write ${EnvFile}: $_" }
        Say "wrote $EnvFile"
    }
}

function Switch-Current {
    $item = Get-CurrentJunction
    $previous = $null
    if ($item) {
        $previous = @($item.Target)[0]
        # Directory.Delete on a junction removes the link only; Remove-Item could recurse into the target.
        [System.IO.Directory]::Delete($Current, $false)
    }
    try {
        New-Item -ItemType Junction -Path $Current -Target $Rel | Out-Null
    } catch {
        if ($previous) { New-Item -ItemType Junction -Path $Current -Target $previous | Out-Null }
        Fail 6 "could not point $Current at ${Rel}: $($_.Exception.Message)"
    }
    Say "current -> $Rel"
    if ($previous -and ($previous.TrimEnd('\') -ne $Rel)) {
        Say "previous release kept: $previous"
        Say "roll back (in cmd.exe): rmdir `"$Current`" && mklink /J `"$Current`" `"$previous`""
    }
}

# ---------------------------------------------------------------------------------------------

Test-Bundle
$Cell = Read-BundleEnv
$Py = Resolve-Python $Cell.TARGET_PYTHON
if ($SkipPreflight) { Say 'skipping preflight (-SkipPreflight)' } else { Test-Host }

$Current = Join-Path $Prefix 'current'
$null = Get-CurrentJunction   # refuse a non-junction before anything is installed
$RelName = "$($Cell.BUNDLE_CELL)-" + (Get-FileHash -LiteralPath (Join-Path $Bundle 'SHA256SUMS') -Algorithm SHA256).Hash.ToLowerInvariant().Substring(0, 12)
$Rel = Join-Path (Join-Path $Prefix 'releases') $RelName
Install-Release
# The model catalog the installed wheel ships, named through `current` (see install.sh).
$catalog = Join-Path $Rel 'Lib\site-packages\gpustack\assets\model-catalog.yaml'
if (-not (Test-Path -LiteralPath $catalog)) {
    Fail 5 "the installed GPUStack has no model catalog at $catalog; nothing was switched"
}
Switch-Current
Write-SiteConfig (Join-Path $Current 'Lib\site-packages\gpustack\assets\model-catalog.yaml')

$exe = Join-Path $Prefix 'current\Scripts\gpustack.exe'
if ($Cell.TOOLS_ARCHIVE) {
    $toolsStep = "  1. The tools (llama-box, gguf-parser, fastfetch) were loaded from $($Cell.TOOLS_ARCHIVE)."
} else {
    $toolsStep = @"
  1. This bundle has no tools archive, so gpustack tries to download llama-box, gguf-parser and
     fastfetch when it starts. Check, then load, an archive of 'gpustack download-tools
     --save-archive' made for this host:
       & '$Rel\Scripts\python.exe' -I '$Bundle\check-tools-archive.py' FILE.tar.gz
       & '$Rel\Scripts\gpustack.exe' download-tools --load-archive FILE.tar.gz
"@
}
Write-Host @"

GPUStack $($Cell.GPUSTACK_VERSION) is installed ($($Cell.BUNDLE_CELL)).
  gpustack binary: $exe
  release:         $Rel

Next steps:
$toolsStep
  2. Start GPUStack with the air-gapped configuration ($Config, $EnvFile):
       Get-Content '$EnvFile' | Where-Object { `$_ -match '^[A-Z_]+=' } | ForEach-Object { `$k, `$v = `$_ -split '=', 2; Set-Item "env:`$k" `$v }
       & '$exe' start --config-file '$Config'
"@
exit 0
