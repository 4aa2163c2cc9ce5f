// A whole Haven conversation through the generated Kotlin bindings (JVM, JNA),
// against a real relay process on a loopback port: a supporter registers (the
// association signs them with the `haven` CLI), a help-seeker finds them in the
// verified directory and writes anonymously, the supporter answers through an
// EventListener, both see the same safety number, the retention is agreed, and
// the help-seeker ends it. Calls are `suspend` functions; errors are typed
// HavenException subclasses.
//
//   java ... ConversationKt RELAY_BIN HAVEN_BIN
//
// with -Djna.library.path pointing at the directory holding libhaven_ffi.so.
// Prints `N passed, N failed` and exits non-zero on failure.

import java.io.File
import java.net.InetSocketAddress
import java.net.ServerSocket
import java.net.Socket
import java.nio.file.Files
import java.util.concurrent.CopyOnWriteArrayList
import kotlin.system.exitProcess
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.haven.sdk.Author
import org.haven.sdk.ClientConfig
import org.haven.sdk.DirectoryFilter
import org.haven.sdk.EventListener
import org.haven.sdk.HavenClient
import org.haven.sdk.HavenEvent
import org.haven.sdk.HavenException

var passed = 0
var failed = 0

fun check(name: String, condition: Boolean, detail: String = "") {
    if (condition) {
        passed++
        println("ok   $name")
    } else {
        failed++
        println("FAIL $name $detail")
    }
}

fun freePort(): Int = ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress()).use { it.localPort }

fun waitForPort(port: Int): Boolean {
    repeat(200) {
        try {
            Socket().use { it.connect(InetSocketAddress("127.0.0.1", port), 200) }
            return true
        } catch (e: java.io.IOException) {
            Thread.sleep(50)
        }
    }
    return false
}

fun run(vararg command: String): String {
    val process = ProcessBuilder(*command).redirectError(ProcessBuilder.Redirect.INHERIT).start()
    val out = process.inputStream.bufferedReader().readText()
    check(process.waitFor() == 0) { "${command[0]} ${command[1]} failed" }
    return out.trim()
}

/** Collects events from the library's thread. */
class Collector : EventListener {
    val events = CopyOnWriteArrayList<HavenEvent>()
    val errors = CopyOnWriteArrayList<String>()

    override fun onEvent(event: HavenEvent) {
        events.add(event)
    }

    override fun onError(message: String) {
        errors.add(message)
    }

    /** The first collected event matching [pick], waiting a bounded time. */
    suspend fun <T : HavenEvent> await(pick: (HavenEvent) -> T?): T? {
        repeat(400) {
            for (event in events) {
                val found = pick(event)
                if (found != null) {
                    events.remove(event)
                    return found
                }
            }
            delay(50)
        }
        return null
    }
}

suspend inline fun <reified E : HavenException> expectError(name: String, call: () -> Unit) {
    try {
        call()
        check(name, false, "no error")
    } catch (error: HavenException) {
        check(name, error is E && !error.message.isNullOrEmpty(), "got ${error::class.simpleName}: ${error.message}")
    }
}

suspend fun conversation(work: File, url: String, association: String, haven: String) {
    fun open(name: String, keyByte: Int) = HavenClient.open(
        ClientConfig(
            relayUrl = url,
            associationKey = association.chunked(2).map { it.toInt(16).toByte() }.toByteArray(),
            dataDir = File(work, name).path,
            storageKey = ByteArray(32) { keyByte.toByte() },
        ),
    )

    val supporter = open("supporter", 1)
    val key = supporter.createSupporterIdentity()
    check("supporter key is 32 bytes of hex", key.length == 64)
    run(
        haven, "association", "sign-supporter", "--key", File(work, "association.key").path,
        "--supporter-key", key, "--name", "Kari Nordmann", "--specialty", "general practice",
        "--county", "Vestland", "--town", "Bergen", "--language", "nb", "--relay", url,
    )
    supporter.registerSupporterDevice()
    supporter.setCapacity(1u)
    val collector = Collector()
    supporter.watch(collector)

    val seeker = open("seeker", 2)
    val found = seeker.listSupporters(DirectoryFilter(county = "Vestland"))
    check("the directory lists the supporter", found.map { it.displayName } == listOf("Kari Nordmann"))
    check("filters apply", seeker.listSupporters(DirectoryFilter(county = "Finnmark")).isEmpty())
    val first = "I'm a surgeon and I keep replaying one operation."
    val mine = seeker.startConversation(found[0].key, first)
    check("startConversation returns an id", mine.length == 32)

    val started = collector.await { it as? HavenEvent.ConversationStarted }
    check("the supporter's listener gets the first message", started?.text == first)
    val theirs = started?.conversation ?: ""
    val theirNumber = collector.await { (it as? HavenEvent.SafetyNumber)?.takeIf { e -> e.conversation == theirs } }
    check("and a safety number", theirNumber != null)

    supporter.send(theirs, "I'm listening.")
    val events = seeker.syncOnce()
    check(
        "syncOnce brings the answer",
        events.filterIsInstance<HavenEvent.MessageReceived>().map { it.text } == listOf("I'm listening."),
    )
    val numbers = events.filterIsInstance<HavenEvent.SafetyNumber>().map { it.number }
    check(
        "both sides see the same safety number",
        theirNumber != null && numbers == listOf(theirNumber.number) && numbers == seeker.safetyNumbers(mine),
    )

    // Push: the help-seeker's phone is woken for the next answer, content-free.
    val wakes = CopyOnWriteArrayList<String>()
    val phone = com.sun.net.httpserver.HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)
    phone.createContext("/wake") { exchange ->
        wakes.add(exchange.requestBody.readBytes().decodeToString())
        exchange.sendResponseHeaders(200, -1)
        exchange.close()
    }
    phone.start()
    seeker.registerConversationPush(mine, "http://127.0.0.1:${phone.address.port}/wake", "seeker-phone".toByteArray())
    supporter.send(theirs, "Take your time.")
    repeat(200) { if (wakes.isEmpty()) delay(50) }
    check("a push wakes the help-seeker, carrying only the token", wakes == listOf("{\"token\":\"c2Vla2VyLXBob25l\"}"), wakes.toString())
    check(
        "and syncOnce on wake-up brings the message",
        seeker.syncOnce().filterIsInstance<HavenEvent.MessageReceived>().map { it.text } == listOf("Take your time."),
    )
    seeker.registerConversationPush(mine, "", ByteArray(0))
    phone.stop(0)

    seeker.send(mine, "Thank you.")
    val received = collector.await { (it as? HavenEvent.MessageReceived)?.takeIf { e -> e.conversation == theirs } }
    check("the listener gets the next message", received?.text == "Thank you.")
    check(
        "history, oldest first",
        seeker.history(mine).map { it.author to it.text } ==
            listOf(
                Author.ME to first,
                Author.THEM to "I'm listening.",
                Author.THEM to "Take your time.",
                Author.ME to "Thank you.",
            ),
    )

    supporter.setRetention(theirs, 3600uL)
    check(
        "the retention reaches the other side",
        seeker.syncOnce().any { it is HavenEvent.RetentionChanged && it.seconds == 3600uL },
    )
    check("and applies there", seeker.retention(mine).seconds == 3600uL)

    val other = open("other", 3)
    expectError<HavenException.NotTakingConversations>("a full supporter refuses clearly") {
        runBlocking { other.startConversation(found[0].key, "Hello?") }
    }
    expectError<HavenException.UnknownConversation>("an unknown conversation") {
        runBlocking { seeker.send("00".repeat(16), "hello") }
    }
    expectError<HavenException.InvalidArgument>("a malformed id") {
        runBlocking { seeker.send("not hex", "hello") }
    }
    expectError<HavenException.OnlyHelpSeeker>("only the help-seeker keeps a transcript") {
        supporter.keepTranscript(theirs, true)
    }
    open("closed", 5).close()
    expectError<HavenException.WrongStorageKey>("the wrong storage key") { open("closed", 9) }
    // A data directory whose state is put back from an older copy is refused.
    open("rolled", 6).use { it.deviceLinkCode(key) }
    val state = File(File(work, "rolled"), "state")
    state.copyRecursively(File(work, "rolled-copy"))
    open("rolled", 6).use { it.deviceLinkCode(key) }
    state.deleteRecursively()
    File(work, "rolled-copy").copyRecursively(state)
    expectError<HavenException.RolledBack>("a data directory put back from an older copy") {
        open("rolled", 6)
    }

    check("nothing waits to be posted", seeker.queuedEnvelopes() == 0uL)
    seeker.setSyncSpreadMs(500uL)
    expectError<HavenException.InvalidArgument>("a sync spread over a minute") {
        seeker.setSyncSpreadMs(60_001uL)
    }
    seeker.setSyncSpreadMs(0uL)
    expectError<HavenException.BadRelayAddress>("a proxy that is not SOCKS5") {
        HavenClient.open(
            ClientConfig(
                relayUrl = url,
                associationKey = association.chunked(2).map { it.toInt(16).toByte() }.toByteArray(),
                dataDir = File(work, "proxied").path,
                storageKey = ByteArray(32),
                proxy = "http://127.0.0.1:8080",
            ),
        )
    }
    // Devices: a laptop joins this supporter by code, and is removed again.
    val own = supporter.deviceIdentity()
    check("the device list holds this device", supporter.supporterDevices() == listOfNotNull(own))
    val laptop = open("laptop", 4)
    supporter.approveDevice(laptop.deviceLinkCode(key))
    laptop.syncOnce()
    check("the laptop joins the list", supporter.supporterDevices().toSet() == setOfNotNull(own, laptop.deviceIdentity()))
    supporter.removeDevice(laptop.deviceIdentity()!!)
    check("and leaves it again", supporter.supporterDevices() == listOfNotNull(own))
    laptop.close()

    seeker.endConversation(mine)
    check("ended on the help-seeker's device", seeker.conversations().isEmpty())
    val ended = collector.await { (it as? HavenEvent.ConversationEnded)?.takeIf { e -> e.conversation == theirs } }
    check("the supporter's listener learns it ended", ended != null)
    check("and nothing is left there", supporter.conversations().isEmpty())
    supporter.stopWatching()
    check("the listener saw no errors", collector.errors.isEmpty(), collector.errors.toString())
    listOf(supporter, seeker, other).forEach { it.close() }
}

fun main(args: Array<String>) {
    val (relayBin, haven) = args
    val work = Files.createTempDirectory("haven-kotlin").toFile()
    var relay: Process? = null
    try {
        val association = run(haven, "association", "init", "--key", File(work, "association.key").path)
        val port = freePort()
        relay = ProcessBuilder(
            relayBin, "--listen", "127.0.0.1:$port", "--metrics-listen", "off",
            "--data-dir", File(work, "relay").path, "--association-key", association,
            "--push-allow-local-endpoints",
        ).redirectError(File(work, "relay.log")).start()
        if (!waitForPort(port)) {
            check("the relay starts", false)
        } else {
            runBlocking { withTimeout(120_000) { conversation(work, "http://127.0.0.1:$port", association, haven) } }
        }
    } catch (error: Exception) {
        check("the conversation runs to the end", false, "${error::class.simpleName}: ${error.message}")
    } finally {
        relay?.destroy()
        relay?.waitFor()
        work.deleteRecursively()
    }
    println("$passed passed, $failed failed")
    exitProcess(if (failed > 0 || passed == 0) 1 else 0)
}
