import ArgumentParser
import Foundation
import WeftCore
import WeftRuntime

/// `weft cert create-ca|create-node|create-client`: the certificates of
/// TLS connections, in CockroachDB's model: one CA per cluster, a node
/// certificate every node presents (as server and as client), client
/// certificates for clients. Made with the `openssl` tool; keys are EC
/// P-256, mode 0600. Files in `--certs-dir`: `ca.crt`, `ca.key`,
/// `node.crt`, `node.key`, `client.crt`, `client.key`.
struct CertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cert",
        abstract: "Create the CA, node and client certificates for TLS connections (--tls).",
        subcommands: [CreateCA.self, CreateNode.self, CreateClient.self]
    )

    struct Common: ParsableArguments {
        @Option(name: .customLong("certs-dir"), help: "Directory of the certificates and keys.") var certsDir: String
        @Option(name: .customLong("lifetime-days"), help: "Validity of the certificate, in days.") var lifetimeDays = 3650
        @Flag(help: "Replace existing files.") var overwrite = false
        func validate() throws {
            if !(1...36500).contains(lifetimeDays) { throw ValidationError("--lifetime-days must be 1...36500") }
        }
    }

    struct CreateCA: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create-ca", abstract: "Create the cluster's certificate authority (ca.crt, ca.key).")
        @OptionGroup var common: Common
        func run() throws {
            do { try CertFiles(common.certsDir).createCA(days: common.lifetimeDays, overwrite: common.overwrite) } catch { fail(error, json: false) }
            print("created \(common.certsDir)/ca.crt and ca.key (keep ca.key off the nodes once their certificates are made)")
        }
    }

    struct CreateNode: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create-node", abstract: "Create node.crt and node.key, signed by the CA, for the given hosts.")
        @OptionGroup var common: Common
        @Option(name: .customLong("host"), help: "A name or IP address the node is reached at (repeatable; default 127.0.0.1 and localhost).") var hosts: [String] = []
        func run() throws {
            let names = hosts.isEmpty ? ["127.0.0.1", "localhost"] : hosts
            do { try CertFiles(common.certsDir).createLeaf(.node, hosts: names, days: common.lifetimeDays, overwrite: common.overwrite) } catch { fail(error, json: false) }
            print("created \(common.certsDir)/node.crt and node.key for \(names.joined(separator: ", "))")
        }
    }

    struct CreateClient: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create-client", abstract: "Create client.crt and client.key, signed by the CA.")
        @OptionGroup var common: Common
        func run() throws {
            do { try CertFiles(common.certsDir).createLeaf(.client, hosts: [], days: common.lifetimeDays, overwrite: common.overwrite) } catch { fail(error, json: false) }
            print("created \(common.certsDir)/client.crt and client.key")
        }
    }
}

extension CertFiles {
    enum Leaf: String { case node, client }

    func createCA(days: Int, overwrite: Bool) throws(WeftError) {
        try prepare([caCert, caKey], overwrite: overwrite)
        try openssl(["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", caKey, "-out", caCert, "-days", String(days), "-subj", "/O=Weft/CN=Weft CA",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        chmod(caKey, 0o600)
        chmod(caCert, 0o644)
    }

    func createLeaf(_ leaf: Leaf, hosts: [String], days: Int, overwrite: Bool) throws(WeftError) {
        guard FileManager.default.fileExists(atPath: caCert), FileManager.default.fileExists(atPath: caKey) else {
            throw WeftError(.notFound, "no CA in \(dir) (ca.crt and ca.key); run `weft cert create-ca --certs-dir \(dir)` first")
        }
        let (cert, key) = leaf == .node ? (nodeCert, nodeKey) : (clientCert, clientKey)
        try prepare([cert, key], overwrite: overwrite)
        let csr = dir + "/\(leaf.rawValue).csr.\(getpid())"
        let ext = dir + "/\(leaf.rawValue).ext.\(getpid())"
        defer {
            unlink(csr)
            unlink(ext)
        }
        var lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        switch leaf {
        case .node:
            lines.append("extendedKeyUsage=serverAuth,clientAuth")
            let sans = hosts.map { h in (h.contains(":") || h.split(separator: ".").allSatisfy { Int($0) != nil }) ? "IP:\(h)" : "DNS:\(h)" }
            lines.append("subjectAltName=" + sans.joined(separator: ","))
        case .client:
            lines.append("extendedKeyUsage=clientAuth")
        }
        do { try (lines.joined(separator: "\n") + "\n").write(toFile: ext, atomically: true, encoding: .utf8) } catch {
            throw WeftError(.readOnly, "cannot write \(ext): \(error.localizedDescription)")
        }
        try openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", key, "-out", csr, "-subj", "/O=Weft/CN=\(leaf.rawValue)"])
        chmod(key, 0o600)
        let serial = "0x" + String(UInt64.random(in: 1...UInt64.max), radix: 16)
        try openssl(["x509", "-req", "-in", csr, "-CA", caCert, "-CAkey", caKey, "-set_serial", serial,
                     "-out", cert, "-days", String(days), "-extfile", ext])
        chmod(cert, 0o644)
    }

    func prepare(_ files: [String], overwrite: Bool) throws(WeftError) {
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) } catch {
            throw WeftError(.readOnly, "cannot create \(dir): \(error.localizedDescription)")
        }
        for f in files where FileManager.default.fileExists(atPath: f) {
            guard overwrite else { throw WeftError(.invalidArgument, "\(f) exists; pass --overwrite to replace it") }
            unlink(f)
        }
    }

    /// Runs the `openssl` tool; its error output on failure.
    func openssl(_ args: [String]) throws(WeftError) {
        guard let tool = ["/usr/bin/openssl", "/usr/local/bin/openssl", "/bin/openssl"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw WeftError(.unavailable, "weft cert needs the openssl tool (apt-get install -y openssl)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        let old = umask(0o077)  // keys are never readable by others, not even for a moment
        defer { umask(old) }
        do { try p.run() } catch { throw WeftError(.unavailable, "cannot run \(tool): \(error.localizedDescription)") }
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw WeftError(.storage, "openssl \(args[0]) failed: \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
    }
}
