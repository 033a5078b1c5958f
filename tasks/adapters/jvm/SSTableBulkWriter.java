/*
 * The JVM half of the backfill's "sstable" load method (tasks/adapters/sstable.py is the other).
 *
 * Python projects each chunk with tasks.core.projection and sends the rows here already serialized
 * in CQL's binary format; this process writes them into SSTables with Cassandra's own
 * CQLSSTableWriter (every cell stamped with the row's version: the INSERT carries
 * "USING TIMESTAMP ?"), then streams the chunk's SSTables to the replicas that own their
 * token ranges with Cassandra's SSTableLoader, the library behind sstableloader. The cluster
 * then receives files instead of executing a million INSERTs: no commit log, no memtable.
 *
 * Run with Java 17 as a single-file program (the classpath is cassandra-all and its
 * dependencies):  java -cp 'jars/*' SSTableBulkWriter.java HOST:PORT[,...] STORAGE_PORT [KEYSPACE]
 * (tasks/adapters/sstable.py compiles it once instead). KEYSPACE: ask for its ring at start.
 * Credentials, when the cluster wants them: CQRS_SCYLLA_USERNAME / CQRS_SCYLLA_PASSWORD.
 *
 * Protocol: commands on stdin, one header line each (fields separated by tabs), replies on
 * stdout, one line per STREAM or PING. Everything the libraries print goes to stderr.
 *   OPEN  <writer id>\t<directory>\t<CREATE TABLE ...>\t<INSERT ... USING TIMESTAMP ?>
 *   ROWS  <writer id>\t<rows>\t<columns>\t<bytes>   then <bytes> bytes, column after column:
 *         <rows> big-endian int32 lengths (-1 = null), then the values' bytes back to back
 *   STREAM <directory>   close the writers opened under it, stream what they wrote, delete it
 *         reply (tab-separated): OK <directory> <sstables> <bytes> <rows> <close ms> <stream ms>
 *                              | ERR <directory> <transient|terminal> <why>
 *   PING                 reply: PONG <the SSTable version written, e.g. nb>
 * End of input ends the process, and so does any error the protocol cannot survive (the
 * process halts: the caller sees it end instead of waiting for a reply that never comes).
 * The first error in OPEN or ROWS fails the next STREAM of that directory: terminal when
 * the rows or the schema are wrong, transient when it is I/O (a full disk, say).
 */

import java.io.BufferedInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicLong;
import java.util.stream.Stream;

import org.apache.cassandra.config.DatabaseDescriptor;
import org.apache.cassandra.config.EncryptionOptions;
import org.apache.cassandra.io.sstable.CQLSSTableWriter;
import org.apache.cassandra.io.sstable.SSTableLoader;
import org.apache.cassandra.streaming.StreamEvent;
import org.apache.cassandra.streaming.StreamEventHandler;
import org.apache.cassandra.streaming.StreamState;
import org.apache.cassandra.streaming.StreamingChannel;
import org.apache.cassandra.tools.BulkLoadConnectionFactory;
import org.apache.cassandra.utils.NativeSSTableLoaderClient;
import org.apache.cassandra.utils.OutputHandler;

public final class SSTableBulkWriter {

    /** Rows buffered per writer before it writes an SSTable (in the background). */
    private static final int BUFFER_MIB = Integer.getInteger("cqrs.sstable.buffer.mib", 64);
    /** How long one answer about the ring is trusted. */
    private static final long RING_MAX_AGE_NS = 300L * 1_000_000_000L;

    /** A loader client that asks the cluster for its ring and schema once per keyspace, not
     * once per stream: a load streams every chunk separately (so a chunk is the unit of
     * resume), and a driver session per chunk would cost more than the stream. */
    static final class RingOnceClient extends NativeSSTableLoaderClient {
        private boolean ready;
        final long created = System.nanoTime();

        private final int storagePort;

        RingOnceClient(List<InetSocketAddress> hosts, int storagePort, String user, String password) {
            super(hosts, storagePort, user, password, null);
            this.storagePort = storagePort;
        }

        @Override
        public synchronized void init(String keyspace) {
            if (!ready) {
                super.init(keyspace);
                ready = true;
            }
        }

        @Override
        public void stop() {
            // Kept for the next chunk's stream.
        }

        @Override
        public StreamingChannel.Factory getConnectionFactory() {
            // As sstableloader connects: the default factory looks up a node's preferred IP in
            // its own system tables, which a client does not have.
            return new BulkLoadConnectionFactory(new EncryptionOptions.ServerEncryptionOptions(), storagePort);
        }
    }

    static final class Writer {
        final Path directory;
        final CQLSSTableWriter sstables;
        long rows;

        Writer(Path directory, CQLSSTableWriter sstables) {
            this.directory = directory;
            this.sstables = sstables;
        }
    }

    private final List<InetSocketAddress> hosts;
    private final int storagePort;
    private final String user = System.getenv("CQRS_SCYLLA_USERNAME");
    private final String password = System.getenv("CQRS_SCYLLA_PASSWORD");
    private final Map<String, RingOnceClient> clients = new java.util.concurrent.ConcurrentHashMap<>();
    private final Map<String, Writer> writers = new HashMap<>();
    private final Map<Path, String> failures = new HashMap<>();
    private final PrintStream replies;

    SSTableBulkWriter(List<InetSocketAddress> hosts, int storagePort, PrintStream replies) {
        this.hosts = hosts;
        this.storagePort = storagePort;
        this.replies = replies;
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2 || args.length > 3) {
            System.err.println("usage: SSTableBulkWriter HOST:PORT[,HOST:PORT...] STORAGE_PORT [KEYSPACE]");
            System.exit(2);
        }
        List<InetSocketAddress> hosts = new ArrayList<>();
        for (String hostPort : args[0].split(",")) {
            int colon = hostPort.lastIndexOf(':');
            hosts.add(new InetSocketAddress(hostPort.substring(0, colon),
                                            Integer.parseInt(hostPort.substring(colon + 1))));
        }
        // Replies get the real stdout; the libraries' progress lines and logs go to stderr.
        PrintStream replies = new PrintStream(new FileOutputStream(FileDescriptor.out), true,
                                              StandardCharsets.UTF_8);
        System.setOut(System.err);
        // The SSTable version must be one the cluster writes itself: a Cassandra 5 node in its
        // default 4.x storage compatibility refuses to restart with 5.0 ("oa") files in its
        // data directories. A client is always initialised without that compatibility, and
        // the version is fixed when the format's version class is initialised: so initialise
        // it first, while the compatibility mode still comes from the system property.
        String version = System.getProperty("cqrs.sstable.version", "oa");
        if (!version.equals("oa")) {
            System.setProperty("cassandra.test.storage_compatibility_mode", "CASSANDRA_4");
            Class.forName("org.apache.cassandra.io.sstable.format.big.BigFormat$BigVersion");
        }
        DatabaseDescriptor.clientInitialization();
        // A client's defaults cap streaming at 24 MiB/s; a backfill is paced by its caller.
        long throttleMib = Long.getLong("cqrs.sstable.throttle.mib", 0);
        DatabaseDescriptor.setStreamThroughputOutboundBytesPerSec(throttleMib * 1024 * 1024);
        DatabaseDescriptor.setEntireSSTableStreamThroughputOutboundMebibytesPerSec((int) throttleMib);
        SSTableBulkWriter server = new SSTableBulkWriter(hosts, Integer.parseInt(args[1]), replies);
        if (args.length == 3) {
            server.warmUp(args[2]);
        }
        try {
            server.serve(new DataInputStream(new BufferedInputStream(System.in, 1 << 20)));
        } catch (Throwable t) {
            // Out of step with the caller or out of memory: end here, whatever threads remain
            // (the writers' disk threads are not daemons and would keep the JVM waiting).
            t.printStackTrace();
            Runtime.getRuntime().halt(1);
        }
        // Non-daemon threads (streaming, the driver) would keep the JVM alive.
        System.exit(0);
    }

    /** Ask for the ring and schema now, while the caller projects its first chunk: a cold
     * JVM's first driver session takes seconds. A failure here is only logged; the first
     * STREAM asks again and reports it. */
    void warmUp(String keyspace) {
        RingOnceClient client = client(keyspace);
        Thread t = new Thread(() -> {
            try {
                CQLSSTableWriter.builder();  // loads and initialises the writer's classes
                client.init(keyspace);
            } catch (Exception e) {
                System.err.println("warm-up: " + e);
            }
        }, "ring-warm-up");
        t.setDaemon(true);
        t.start();
    }

    void serve(DataInputStream in) throws IOException {
        String line;
        while ((line = readLine(in)) != null) {
            String[] f = line.split("\t", -1);
            switch (f[0]) {
                case "OPEN" -> open(f);
                case "ROWS" -> rows(f, in);
                case "STREAM" -> replies.println(stream(Paths.get(f[1])));
                case "PING" -> replies.println(
                    "PONG " + DatabaseDescriptor.getSelectedSSTableFormat().getLatestVersion());
                default -> throw new IOException("unknown command " + f[0]);
            }
        }
    }

    private void open(String[] f) {
        Path dir = Paths.get(f[2]);
        try {
            Files.createDirectories(dir);
            CQLSSTableWriter w = CQLSSTableWriter.builder()
                .inDirectory(dir.toString())
                .forTable(f[3])
                .using(f[4])
                .withBufferSizeInMiB(BUFFER_MIB)
                .build();
            writers.put(f[1], new Writer(dir, w));
        } catch (Exception e) {
            failures.putIfAbsent(dir, severity(e) + "\tOPEN " + f[1] + ": " + e);
        }
    }

    private void rows(String[] f, DataInputStream in) throws IOException {
        int rows = Integer.parseInt(f[2]), columns = Integer.parseInt(f[3]);
        byte[] payload = new byte[Integer.parseInt(f[4])];
        in.readFully(payload);  // read it all, whatever happens, to stay in step with the stream
        Writer w = writers.get(f[1]);
        if (w == null || failures.containsKey(w.directory)) {
            return;  // OPEN failed: already recorded for STREAM to report
        }
        try {
            ByteBuffer bb = ByteBuffer.wrap(payload);
            int[][] lengths = new int[columns][rows];
            int[] cursor = new int[columns];
            int pos = 0;
            for (int c = 0; c < columns; c++) {
                for (int r = 0; r < rows; r++, pos += 4) {
                    lengths[c][r] = bb.getInt(pos);
                }
                cursor[c] = pos;
                for (int r = 0; r < rows; r++) {
                    pos += Math.max(0, lengths[c][r]);
                }
            }
            if (pos != payload.length) {
                throw new IOException("ROWS " + f[1] + ": lengths add up to " + pos + " bytes, got " + payload.length);
            }
            for (int r = 0; r < rows; r++) {
                List<ByteBuffer> values = new ArrayList<>(columns);
                for (int c = 0; c < columns; c++) {
                    int n = lengths[c][r];
                    if (n < 0) {
                        values.add(null);
                    } else {
                        values.add(ByteBuffer.wrap(payload, cursor[c], n).slice());
                        cursor[c] += n;
                    }
                }
                w.sstables.rawAddRow(values);
            }
            w.rows += rows;
        } catch (Exception e) {
            failures.putIfAbsent(w.directory, severity(e) + "\tROWS " + f[1] + ": " + e);
        }
    }

    /** Close the writers under {@code dir}; returns the rows they wrote, adds failures to
     * {@code errors}. */
    private long closeWriters(Path dir, List<String> errors) {
        long rows = 0;
        for (Iterator<Map.Entry<String, Writer>> it = writers.entrySet().iterator(); it.hasNext(); ) {
            Writer w = it.next().getValue();
            if (!w.directory.startsWith(dir)) {
                continue;
            }
            it.remove();
            try {
                w.sstables.close();
                rows += w.rows;
            } catch (Exception e) {
                errors.add(severity(e) + "\tclose " + w.directory + ": " + e);
            }
        }
        return rows;
    }

    private String stream(Path dir) {
        long t0 = System.nanoTime();
        List<String> errors = new ArrayList<>();
        long rows = closeWriters(dir, errors);
        String failure = null;
        for (Path p : new ArrayList<>(failures.keySet())) {
            if (p.startsWith(dir)) {
                String f = failures.remove(p);
                failure = failure == null ? f : failure;
            }
        }
        if (failure == null && !errors.isEmpty()) {
            failure = errors.get(0);
        }
        if (failure != null) {
            delete(dir);
            return "ERR\t" + dir + "\t" + oneLine(failure);
        }
        long t1 = System.nanoTime();
        long sstables = 0, bytes = 0;
        try {
            for (Path tableDir : tableDirectories(dir)) {
                String keyspace = tableDir.getParent().getFileName().toString();
                long here = 0;
                for (Path file : list(tableDir)) {
                    if (file.getFileName().toString().endsWith("-Data.db")) {
                        here++;
                    }
                    bytes += Files.size(file);
                }
                sstables += here;
                RingOnceClient client = client(keyspace);
                SkipRecorder output = new SkipRecorder();
                SSTableLoader loader = new SSTableLoader(
                    new org.apache.cassandra.io.util.File(tableDir.toFile()), client, output);
                PlanCounter plan = new PlanCounter();
                StreamState state = loader.stream(Collections.emptySet(), plan).get();
                long sent = plan.files.get();
                if (state.hasFailedSession() || !loader.getFailedHosts().isEmpty()) {
                    delete(dir);
                    return "ERR\t" + dir + "\ttransient\tstreaming " + tableDir + " failed to "
                           + loader.getFailedHosts();
                }
                // SSTableLoader skips what it cannot open or place (an unknown table, a missing
                // component) and still reports success: every SSTable must have gone somewhere.
                if (!output.skipped.isEmpty() || sent < here) {
                    delete(dir);
                    clients.remove(keyspace);
                    return "ERR\t" + dir + "\ttransient\t" + tableDir + ": " + sent + " of " + here
                           + " SSTables streamed; " + oneLine(String.join("; ", output.skipped));
                }
            }
        } catch (Exception e) {
            delete(dir);
            clients.clear();  // the ring may have changed: ask again next time
            return "ERR\t" + dir + "\ttransient\tstreaming failed: " + oneLine(String.valueOf(rootCause(e)));
        }
        long t2 = System.nanoTime();
        delete(dir);
        return String.format("OK\t%s\t%d\t%d\t%d\t%d\t%d", dir, sstables, bytes, rows,
                             (t1 - t0) / 1_000_000, (t2 - t1) / 1_000_000);
    }

    /** The keyspace's loader client; asked again for the ring after RING_MAX_AGE_NS, so a
     * long load follows nodes that join, move or leave (as each sstableloader run would). */
    private RingOnceClient client(String keyspace) {
        RingOnceClient c = clients.get(keyspace);
        if (c == null || System.nanoTime() - c.created > RING_MAX_AGE_NS) {
            c = new RingOnceClient(hosts, storagePort, user, password);
            clients.put(keyspace, c);
        }
        return c;
    }

    /** Counts the SSTables the stream plan sends, as each session is prepared (what
     * sstableloader's progress display counts). */
    static final class PlanCounter implements StreamEventHandler {
        final AtomicLong files = new AtomicLong();

        @Override
        public void handleStreamEvent(StreamEvent event) {
            if (event.eventType == StreamEvent.Type.STREAM_PREPARED) {
                files.addAndGet(((StreamEvent.SessionPreparedEvent) event).session.getTotalFilesToSend());
            }
        }

        @Override
        public void onSuccess(StreamState state) {
        }

        @Override
        public void onFailure(Throwable t) {
        }
    }

    /** Records the files SSTableLoader skips (it only logs them). */
    static final class SkipRecorder extends OutputHandler.LogOutput {
        final List<String> skipped = Collections.synchronizedList(new ArrayList<>());

        @Override
        public void output(String msg) {
            if (msg.startsWith("Skipping")) {
                skipped.add(msg);
            }
            super.output(msg);
        }

        @Override
        public void warn(String msg) {
            skipped.add(msg);
            super.warn(msg);
        }

        @Override
        public void warn(Throwable th, String msg) {
            skipped.add(msg + ": " + th);
            super.warn(th, msg);
        }
    }

    /** I/O trouble may pass (a full disk freed); anything else is the rows or the schema. */
    private static String severity(Throwable e) {
        for (Throwable t = e; t != null; t = t.getCause() == t ? null : t.getCause()) {
            if (t instanceof IOException || t instanceof org.apache.cassandra.io.FSError) {
                return "transient";
            }
        }
        return "terminal";
    }

    /** Directories <dir>/.../<keyspace>/<table> holding SSTables (SSTableLoader's layout). */
    private static List<Path> tableDirectories(Path dir) throws IOException {
        if (!Files.exists(dir)) {
            return List.of();
        }
        try (Stream<Path> s = Files.walk(dir)) {
            return s.filter(p -> p.getFileName().toString().endsWith("-Data.db"))
                    .map(Path::getParent).distinct().sorted().toList();
        }
    }

    private static List<Path> list(Path dir) throws IOException {
        try (Stream<Path> s = Files.list(dir)) {
            return s.toList();
        }
    }

    private static void delete(Path dir) {
        if (!Files.exists(dir)) {
            return;
        }
        try (Stream<Path> s = Files.walk(dir)) {
            s.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        } catch (IOException e) {
            System.err.println("cannot delete " + dir + ": " + e);
        }
    }

    private static Throwable rootCause(Throwable t) {
        while (t.getCause() != null && t.getCause() != t) {
            t = t.getCause();
        }
        return t;
    }

    private static String oneLine(String s) {
        return s.replace('\n', ' ').replace('\r', ' ');
    }

    /** A UTF-8 line without its '\n', or null at end of input. */
    private static String readLine(InputStream in) throws IOException {
        ByteArrayOutputStream line = new ByteArrayOutputStream(256);
        int b;
        while ((b = in.read()) != '\n') {
            if (b < 0) {
                if (line.size() == 0) {
                    return null;
                }
                throw new EOFException("input ended inside a command");
            }
            line.write(b);
        }
        return line.toString(StandardCharsets.UTF_8);
    }
}
