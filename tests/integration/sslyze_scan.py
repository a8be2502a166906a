"""sslyze over a JSON request on stdin; prints {name: sslyze's own JSON of that scan} (the CLI's `--json_out` form).

Runs in the sslyze venv (`.venv-tlsscan`, made by `./dev.sh setup` from pyproject's `tlsscan` extra), never in the
project's: sslyze pins its own cryptography, and nassl brings its own OpenSSL builds (1.1.1 and, for SSL 2.0/3.0,
1.0.2), so the scanner shares no TLS code with the hub it scans. Only sslyze is imported here.

The request: [{"name", "port", "commands": [ScanCommand values], "cert"?, "key"?, "ca_file"?}] against 127.0.0.1.
One Scanner runs all of them concurrently; each keeps its own client certificate (or none).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main() -> int:
    warnings.simplefilter("ignore")  # sslyze's bundled trust stores trip cryptography deprecation warnings
    from sslyze import (CertificateInfoExtraArgument, ClientAuthenticationCredentials, ScanCommand,
                        ScanCommandsExtraArguments, Scanner, ServerNetworkConfiguration, ServerNetworkLocation,
                        ServerScanRequest, ServerScanResultAsJson)

    scans = json.load(sys.stdin)
    names, requests = {}, []
    for scan in scans:
        creds = None
        if scan.get("cert"):
            creds = ClientAuthenticationCredentials(certificate_chain_path=Path(scan["cert"]),
                                                    key_path=Path(scan["key"]))
        extra = ScanCommandsExtraArguments()
        if scan.get("ca_file"):
            extra = ScanCommandsExtraArguments(
                certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(scan["ca_file"])))
        request = ServerScanRequest(
            server_location=ServerNetworkLocation("127.0.0.1", scan["port"], ip_address="127.0.0.1"),
            network_configuration=ServerNetworkConfiguration("127.0.0.1", tls_client_auth_credentials=creds),
            scan_commands={ScanCommand(c) for c in scan["commands"]}, scan_commands_extra_arguments=extra)
        names[request.uuid] = scan["name"]
        requests.append(request)
    scanner = Scanner()
    scanner.queue_scans(requests)
    out = {names[result.uuid]: ServerScanResultAsJson.model_validate(result).model_dump(mode="json")
           for result in scanner.get_results()}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
